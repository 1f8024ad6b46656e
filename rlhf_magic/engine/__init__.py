"""The training engine: runtime, model loading, data, and the sft / reward / ppo loops.

Never imports IPython or ipywidgets; progress goes out through `rlhf_magic.events`.
"""
