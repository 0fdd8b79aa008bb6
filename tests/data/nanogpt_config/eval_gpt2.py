# The values of nanoGPT's config/eval_gpt2.py (karpathy/nanoGPT): evaluate the base GPT-2.
batch_size = 8
eval_iters = 500
eval_only = True
wandb_log = False
init_from = 'gpt2'
