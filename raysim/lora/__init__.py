"""The one LoRA fine-tuning path: every algorithm that trains LoRA adapters of a dual
encoder (fedavg, fedprox, fedlarge) is a LoraPath (path.py) with a hook or two. Its
settings are the `lora:` section of the config (raysim/config.py, LoraConfig), each
independent of the others and read by one module:

- path.py          LoraPath: the algorithm contract, hooks server_update / prox_mu / configure
- adapters.py      ranks per client (lora.client_ranks), what a client is sent, the LoRA
                   fold rules (algorithm.lora_aggregation: factors, product, hetlora)
- base.py, data.py the model family (lora.base): base checkpoint, its tokenizer, the
                   clients' data (with faults.caption_noise)
- model.py         the resident model: base + one adapter per rank, a locked text tower
- objective.py     the contrastive loss (lora.loss: clip / model_logits), per-pair weights
- backends.py      lora.backend: torch, or DeepSpeed ZeRO 0-3
- distributed.py   the loss of one batch over lora.backend.world_size ranks
- group.py         the rank group: what each rank runs, and its spec for the worker
- train.py         the local epochs and one client's update
- quality.py       lora.quality: data-quality scores and weights (filter / weight)
- contribution.py  lora.contribution: per-client contribution scores
- evaluate.py      zero-shot accuracy and retrieval
- checks.py        combinations of settings the path cannot honour (exit 2)
"""
