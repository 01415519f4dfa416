"""Data: offline corpora, synthetic SFT examples, tokenisation, step-window sampling and the DataModule."""
