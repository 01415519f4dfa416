"""The modeling file copied verbatim into every `python -m src.export` folder (torch + transformers only).

Nothing in `modeling_flexidepth.py` imports from `src`: it must load in an environment without this repository.
"""
