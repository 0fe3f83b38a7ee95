"""PHDS training: multi-k SFT with an anchor curriculum (and the oracle fixed-k baseline)."""
