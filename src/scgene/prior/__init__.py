"""Prior gene knowledge for ScGene (seed 000): co-expression network -> gene2vec, multimodal gene knowledge ->
PCA embedding, and their fusion into the frozen `(vocab_size, hidden_size)` gene prior. Pure numpy / scipy /
gensim / sentence-transformers code, run by `scgene build-prior`; not part of a Hub checkpoint."""
