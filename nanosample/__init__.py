"""nanosample: sample text from GPT-2-family models and see how every token was chosen.

The modules, in the order a reader meets them:
    model      GPT-2 (nanoGPT's names) with an explicit KV cache
    sampling   the sampler: temperature -> top-k -> top-p -> min-p -> draw
    sampler_settings  the sampler's settings, declared once (flags, checks, help)
    fast_sampling     the same sampler, exact and fast on large vocabularies (windows, buckets)
    generate   the loop: prefill, then decode token by token, streaming text
    loader     checkpoints: Hugging Face safetensors, nanoGPT ckpt.pt, the shipped model
    cpu_kernels       the CPU products: oneDNN on packed weights, batch-invariant
    quantize   --quantize: fp16, bf16 or int8 weights in the CPU products
    static_decode     a fixed-shape decode step, captured as a CUDA graph on a GPU
    threads    how many CPU threads, and how OpenMP's threads wait
    tokenizer  GPT-2's BPE (files shipped in assets/) and character vocabularies
    settings   the flags and config files of the scripts
    cli        the scripts' edge: `error:` lines and exit codes, bounded reads of user files,
               outputs written whole, memory checks, Ctrl-C and stdout faults
    explain    the article's tables for every step, as text, JSON Lines and a plot
    explorer   the explain records as one HTML page: point at a token, see how it was drawn
    metrics    the decoding sweep's measures
"""
