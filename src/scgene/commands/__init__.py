"""Sub-commands of the `scgene` command line (see `scgene.cli`)."""
