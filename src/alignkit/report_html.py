"""The HTML of `alignkit report`: sections, tables and inline figures, with its own CSS (no external files)."""

from __future__ import annotations

import html
import math
from typing import Any

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1120px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:34px 0 8px;border-bottom:1px solid #e3e6ea;padding-bottom:4px}
p,li{line-height:1.5;font-size:15px}.muted{color:#5f6b7a;font-size:13px}
table{border-collapse:collapse;font-size:14px;margin:8px 0}th,td{padding:5px 9px;border-bottom:1px solid #e6e8eb;text-align:right}
th{background:#f0f2f5;font-weight:600}td.l,th.l{text-align:left}tr.best td{background:#eef8ee}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #eceef1}figcaption{font-size:13px;color:#5f6b7a}
.scroll{overflow-x:auto}.samples td{vertical-align:top;text-align:left;min-width:150px;font-size:13px}
.samples .g{display:inline-block;margin-left:4px;padding:0 4px;border-radius:3px;font-size:11px;color:#fff}
code{background:#f0f2f5;padding:1px 4px;border-radius:3px}
"""


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _secs(value: Any) -> str:
    if not isinstance(value, int | float):
        return "–"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def _figure(figs: dict[str, str], key: str, caption: str) -> str:
    if key not in figs:
        return f"<p class='muted'>No data for this figure ({html.escape(key)}).</p>"
    return (f"<figure><img alt='{html.escape(key)}' src='data:image/png;base64,{figs[key]}'>"
            f"<figcaption>{caption}</figcaption></figure>")


def headline_table(data: dict[str, Any]) -> str:
    """Per method: gold +- CI, proxy, KL, win rate vs SFT, length, distinct-2, wall time."""
    head = ("<tr><th class='l'>method</th><th>gold reward ± 95% CI</th><th>proxy (RM)</th><th>KL to SFT</th>"
            "<th>win rate vs SFT</th><th>length</th><th>distinct-2</th><th>wall time</th></tr>")
    golds = [data["methods"][k]["gold_reward"] for k in data["headline"]]
    rows = []
    for label in data["headline"]:
        m = data["methods"][label]
        cls = " class='best'" if golds and m["gold_reward"] == max(golds) else ""
        kl = _num(m.get("kl"), 2) + (" (analytic)" if m.get("kind") == "best_of_n" else "")
        rows.append(f"<tr{cls}><td class='l'>{html.escape(label)}</td><td>{_num(m['gold_reward'])} ± "
                    f"{_num(m.get('gold_ci95'))}</td><td>{_num(m.get('proxy_reward'), 2)}</td><td>{kl}</td>"
                    f"<td>{_num(m.get('win_rate_vs_ref'), 2)}</td><td>{_num(m.get('length'), 1)}</td>"
                    f"<td>{_num(m.get('distinct_2'), 2)}</td><td>{_secs(m.get('wall_time_s'))}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _gold_badge(gold: Any) -> str:
    if not isinstance(gold, int | float):
        return ""
    hue = int(120 * max(0.0, min(1.0, gold)))  # red (0) .. green (1)
    return f"<span class='g' style='background:hsl({hue},55%,40%)'>{gold:.2f}</span>"


def samples_table(data: dict[str, Any], n_prompts: int) -> str:
    """The same prompts continued by every method, with gold scores; mean length and distinct-2 below."""
    labels = [k for k in data["headline"] if k in data["samples"]]
    if not labels:
        return "<p class='muted'>No samples.</p>"
    head = "<tr><th class='l'>prompt</th>" + "".join(f"<th class='l'>{html.escape(k)}</th>" for k in labels) + "</tr>"
    by_index = {k: {r["index"]: r for r in data["samples"][k]} for k in labels}
    first = data["samples"][labels[0]]
    rows = []
    for row in first[:n_prompts]:
        cells = []
        for k in labels:
            s = by_index[k].get(row["index"])
            cells.append("<td>–</td>" if s is None else
                         f"<td>…{html.escape(s['response'])} {_gold_badge(s.get('gold'))}</td>")
        rows.append(f"<tr><td class='l'><b>{html.escape(row['prompt'])}</b></td>{''.join(cells)}</tr>")
    stats = "".join(f"<td>length {_num(data['methods'][k].get('length'), 1)}, distinct-2 "
                    f"{_num(data['methods'][k].get('distinct_2'), 2)}</td>" for k in labels)
    rows.append(f"<tr><td class='l'><i>all {data['settings'].get('n_prompts', '')} prompts</i></td>{stats}</tr>")
    return f"<div class='scroll'><table class='samples'>{head}{''.join(rows)}</table></div>"


def timings_table(times: dict[str, float]) -> str:
    """Wall time of every step of the pipeline (cached steps keep the time of their run)."""
    rows = "".join(f"<tr><td class='l'>{html.escape(k)}</td><td>{_secs(v)}</td></tr>" for k, v in times.items())
    total = sum(v for v in times.values() if isinstance(v, int | float))
    return f"<table><tr><th class='l'>step</th><th>wall time</th></tr>{rows}<tr><th class='l'>total</th><th>" \
           f"{_secs(total)}</th></tr></table>"


INTRO = """
<p>Each method below starts from the same supervised (SFT) model of tweets and tries to make its continuations of
a tweet's first few words <b>positive</b>. A fixed <i>gold scorer</i> (a sentiment classifier) stands in for human
judgement; methods never see it directly. They see 5,000 comparisons labelled by it, or a <i>reward model</i>
(the proxy) trained on those comparisons. Moving the policy away from SFT costs <b>KL divergence</b>: the further
it moves, the more it can gain &mdash; and the more it can exploit the proxy's mistakes (reward hacking).</p>
<p>Every method is evaluated the same way: one sample per held-out prompt with the same seed and sampling
settings; gold reward with a 95% confidence interval, the proxy reward, the exact KL to the SFT reference
(best-of-N: the analytic KL log N &minus; (N&minus;1)/N), win rate against SFT samples judged by the gold scorer,
mean length and distinct-2 (unique word-piece pairs / all pairs).</p>
"""


def render(cfg: Any, data: dict[str, Any], summary: dict[str, Any], figs: dict[str, str]) -> str:
    """The whole page."""
    s, rm = data["settings"], summary["reward_model"]
    settings = (f"{s.get('n_prompts', '?')} held-out prompts of the <code>{html.escape(str(s.get('world', '')))}"
                f"</code> world, temperature {s.get('temperature', '?')}, at most {s.get('max_new_tokens', '?')} new "
                f"tokens, seed {s.get('seed', '?')}.")
    fit = summary.get("best_of_n_gold_fit")
    fit_text = f" Best-of-N gold fit: α = {fit['alpha']:.3g}, β = {fit['beta']:.3g}." if fit else ""
    body = [
        f"<h1>{html.escape(cfg.title)}</h1><p class='muted'>Generated {summary['created']} by "
        f"<code>alignkit report</code>. {settings}</p>", INTRO,
        "<h2>Headline</h2>", headline_table(data),
        "<p class='muted'>Wall time is the training (or sampling) step's own; best-of-N needs no training but samples "
        "N responses for every prompt at inference time.</p>",
        "<h2>Gold reward against KL: the frontier</h2>",
        _figure(figs, "frontier", "Large markers: final policies on the evaluation prompts (bars: 95% CI). Thin lines: "
                "held-out evaluations along training (PPO/RLOO/GRPO/DPO) or after each rejection-sampling round. "
                "Dashed: best-of-N for N = 1, 2, 4, … (as in Rafailov et al. 2023, Fig. 2)."),
        "<h2>Reward-model over-optimisation</h2>",
        _figure(figs, "overoptimisation", "Gain over the SFT policy in proxy (reward model) and gold reward as the "
                f"policy moves away (d = √KL). Fit R(d) = d(α − βd) as in Gao et al. 2023.{fit_text}"),
        "<h2>PPO training</h2>",
        _figure(figs, "ppo", "Rollout rewards, KL to the reference against the adaptive controller's target, and "
                "the KL coefficient β per RL step."),
        "<h2>Reward model</h2>",
        f"<p>Trained on {_num(rm.get('labels'))} comparisons: held-out pairwise accuracy "
        f"<b>{_num(rm.get('pairwise_accuracy'))}</b>, Spearman correlation with the gold score "
        f"<b>{_num(rm.get('spearman_gold'))}</b>.</p>",
        _figure(figs, "rm_budget", "The same reward model trained on the first N comparisons."),
        "<h2>Samples: the same prompts, every method</h2>",
        "<p>Continuations (after the prompt, in bold) with their gold score. Short, repetitive or formulaic "
        "continuations with a high score are reward hacking.</p>",
        samples_table(data, cfg.n_sample_prompts),
        "<h2>Pipeline steps</h2>", timings_table(data["timings"]),
        "<p class='muted'>Figures: <code>summary.json</code> next to this page; per-sample table: the eval step's "
        "<code>samples.jsonl</code>.</p>",
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(cfg.title)}"
            f"</title><style>{CSS}</style></head><body><main>{''.join(body)}</main></body></html>")
