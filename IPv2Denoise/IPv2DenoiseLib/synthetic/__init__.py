"""Synthetic chest CT: phantom, breathing motion, synthetic ULDCT/NDCT case folders."""
