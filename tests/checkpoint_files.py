"""Writing test checkpoints: safetensors files (sharded with an index) and transformers' per-expert
on-disk layout of the experts."""
import json

from safetensors.torch import save_file


def write_checkpoint(path, tensors: dict, config: dict, shards: int = 1) -> list:
    """config.json and the tensors as safetensors (one file, or `shards` files and an index);
    returns the tensor files' paths."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return [path / "model.safetensors"]
    names = sorted(tensors)
    files, weight_map = [], {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
        files.append(path / fname)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def per_expert(sd: dict, cfg) -> dict:
    """transformers' on-disk layout: the fused experts split into one tensor per expert and part."""
    out, I = {}, cfg.moe_intermediate_size
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = v[e, :I]
                out[f"{p}{e}.up_proj.weight"] = v[e, I:]
        elif k.endswith("experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out
