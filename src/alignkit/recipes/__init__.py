"""Recipes: stages that orchestrate other stages through their public `run(config)` functions.

Trainers never import each other; a recipe composes them (e.g. rejection sampling = best-of-N
sampling, then SFT on the winners, repeated).
"""
