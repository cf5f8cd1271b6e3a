"""Generated tasks with verifiable answers (data for rewards as code); `alignkit task` writes them."""
