"""ScGene."""
