"""Supervised (SFT) and preference (DPO) training on the factory's shards, with TRL.

Pure core for `longwriter train` (its Prefect tasks and flow: flows/train.py):
  tasks.train.config   TrainConfig, the checked settings
  tasks.train.model    the base model, its tokenizer, the attention kernel
  tasks.train.data     read shards, mix in general SFT data, tokenize with the chat template,
                       report and skip over-long samples
  tasks.train.trainer  TRL trainers (SFT, DPO), packing, LoRA, the loss log
  tasks.train.gguf     save a model that reloads with transformers, export GGUF for llama.cpp
  tasks.train.run      one run end to end and its report

Choices that follow the LongWriter paper (arXiv 2408.07055, section 4.1):
- the loss is averaged over *tokens* of the whole (accumulated) batch, not per sequence, so long
  outputs are not down-weighted; TRL does this when the Trainer passes `num_items_in_batch`;
- packing is used only where it cannot leak attention across samples (padding-free / position_ids
  packing with flash-attention), otherwise every sample is its own sequence;
- only assistant tokens carry loss; a sample longer than `max_seq_len` is skipped and reported,
  never truncated (a truncated 10,000-word answer teaches the model to stop mid-text).

torch / transformers / trl / peft / gguf are imported inside functions so importing these modules
(and so `longwriter --help`) stays fast and works without the `train` extra.
"""
