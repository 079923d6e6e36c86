"""The one LoRA fine-tuning path: every algorithm that trains LoRA adapters of a dual
encoder (fedavg, fedprox, fedlarge) is a setting of it (raysim/lora/path.py, LoraPath).
Its settings are the `lora:` section of the config (raysim/config.py, LoraConfig), each
independent of the others and read by one module:

- adapters.py      ranks per client, what a client is sent, the LoRA fold rules
- base.py, data.py the model family: base checkpoint, its tokenizer, the clients' data
- model.py         the resident model (base + one adapter per rank), devices
- objective.py     the contrastive loss (clip / model_logits), per-pair weights
- backends.py      torch or DeepSpeed ZeRO 0-3 trainers
- distributed.py   one client over world_size ranks (the rank group's work)
- train.py         the local epochs and one client's update
- quality.py       data-quality scores and weights (filter / weight)
- contribution.py  per-client contribution scores (count sketch, cosine)
- evaluate.py      zero-shot accuracy and retrieval
- checks.py        combinations of settings the path cannot honour
"""
