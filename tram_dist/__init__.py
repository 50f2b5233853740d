"""TRAM (Trust Region Aware Minimization) and the SAM family for sharded fine-tuning."""
