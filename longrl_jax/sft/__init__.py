"""CoT-SFT: next-token loss on reasoning traces."""
