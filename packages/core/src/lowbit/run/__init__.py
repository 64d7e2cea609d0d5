"""Running a quantized checkpoint: the runnable model (:mod:`.nn`), loading any format lowbit reads
(:mod:`.load`), perplexity (:mod:`.evaluate`), ``generate``/``chat`` (:mod:`.chat`) and the speed
benchmark against bf16 and llama.cpp (:mod:`.bench`). Quantization itself lives outside this package."""
