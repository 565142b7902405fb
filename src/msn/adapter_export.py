"""Adapter folders: what makes a folder a peft LoRA adapter, and the base model it names.

Exporting adapters is ``msn.adapter_export``; loading one merged is ``msn.loading.merged_model``.

The difference between a fine-tuned and a base checkpoint is taken module by module:

- a linear layer or the input embedding whose weight changed becomes a peft LoRA pair,
  ``B @ A`` = the best rank-``r`` approximation of the difference (truncated SVD, the singular
  values split evenly between the factors, scaling 1), stored in ``dtype``;
- any other module whose parameters changed (norms; a linear layer whose weight stayed but
  whose bias moved) is stored whole (peft's ``modules_to_save``), and a changed bias of a LoRA
  layer with it (``bias="lora_only"``), in float32.

A tied output head shares the embedding's weight, so merging the embedding's pair moves the
head with it, as fine-tuning did. msn always merges an adapter (``merged_model``): unmerged,
peft would add the embedding's pair to the input side only.

The kept fraction of a layer is the share of its difference's squared Frobenius norm (the sum
of squared singular values) that the rank keeps.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from msn.adapter import ADAPTER_WEIGHTS, REPORT, resolve
from msn.errors import MsnError

log = logging.getLogger("msn.adapter")

# Room for the safetensors header (tensor names and offsets) in a size budget.
HEADER_BYTES = 256 * 1024
MiB = 1 << 20


@dataclass
class Target:
    """One module turned into a LoRA pair: ``delta`` is (out, in) for a linear layer, (vocab, dim)
    for an embedding; ``bias`` is its fine-tuned bias when that changed too."""

    name: str
    kind: str
    delta: object
    bias: object = None

    @property
    def full_rank(self) -> int:
        return min(self.delta.shape)

    def bytes_per_rank(self, itemsize: int) -> int:
        return sum(self.delta.shape) * itemsize


def plan(base, tuned) -> tuple[list[Target], list[str], int]:
    """(LoRA targets, modules stored whole, parameters unchanged) for ``tuned`` against ``base``."""
    import torch

    if _tied(base) != _tied(tuned):
        raise MsnError("the base and the tuned model differ in whether the output head is tied to the embedding; "
                       "they are not the same architecture")
    base_params = dict(base.named_parameters())
    changed: dict[str, list[str]] = {}
    unchanged = 0
    for name, p in tuned.named_parameters():
        q = base_params.get(name)
        if q is None or q.shape != p.shape:
            what = "has no" if q is None else f"has another shape ({tuple(q.shape)} vs {tuple(p.shape)}) for"
            raise MsnError(f"the base model {what} parameter {name}; export-lora needs the checkpoint the tuned "
                           "model was fine-tuned from")
        if torch.equal(p, q.to(p.device)):
            unchanged += 1
        else:
            module, _, leaf = name.rpartition(".")
            changed.setdefault(module, []).append(leaf)
    if len(base_params) != unchanged + sum(map(len, changed.values())):
        raise MsnError("the base model has parameters the tuned model lacks; they are not the same architecture")
    targets, whole = [], []
    for module, leaves in changed.items():
        m, b = tuned.get_submodule(module), base.get_submodule(module)
        if isinstance(m, torch.nn.Linear) and "weight" in leaves:
            targets.append(Target(module, "linear", (m.weight - b.weight.to(m.weight.device)).float(),
                                  m.bias if "bias" in leaves else None))
        elif isinstance(m, torch.nn.Embedding) and leaves == ["weight"]:
            targets.append(Target(module, "embedding", (m.weight - b.weight.to(m.weight.device)).float()))
        elif not any(True for _ in m.children()):
            whole.append(module)
        else:
            raise MsnError(f"module {module} changed its own parameters ({', '.join(leaves)}) and has sub-modules; "
                           "export-lora stores only leaf modules whole")
    return targets, whole, unchanged


UNRELATED = 0.5     # a fine-tune moves its weights by far less than this share of their norm


def related(base, targets: list[Target]) -> None:
    """Refuses a tuned model that is not a fine-tune of ``base``: its changed layers differ from the
    base's by more than ``UNRELATED`` of the base weights' norm (an unrelated model of the same
    shapes differs by about 1.4)."""
    diff = sum(float(t.delta.square().sum()) for t in targets)
    ref = sum(float(base.get_submodule(t.name).weight.float().square().sum()) for t in targets)
    if ref > 0 and (diff / ref) ** 0.5 > UNRELATED:
        raise MsnError(f"the tuned model differs from the base by {(diff / ref) ** 0.5:.0%} of the base weights' "
                       "norm: it was not fine-tuned from this base (give the checkpoint it started from)")


def _tied(model) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and emb is not None and out.weight is emb.weight


def rank_for_budget(targets: list[Target], whole_bytes: int, budget_bytes: int, itemsize: int) -> int:
    """The largest rank whose adapter file fits ``budget_bytes`` (no more than the full rank)."""
    per_rank = sum(t.bytes_per_rank(itemsize) for t in targets)
    room = budget_bytes - whole_bytes - HEADER_BYTES
    full = max((t.full_rank for t in targets), default=0)
    if per_rank == 0:
        return 0
    if room < per_rank:
        raise MsnError(f"--budget-mib {budget_bytes / MiB:g}: not even rank 1 fits (rank 1 needs "
                       f"{(per_rank + whole_bytes + HEADER_BYTES) / MiB:.2f} MiB)")
    return min(room // per_rank, full)


def factors(t: Target, rank: int):
    """(A, B, kept fraction) of ``t`` at ``rank`` in peft's layout, zero-padded past the full rank:
    linear A (rank, in), B (out, rank); embedding A (rank, vocab), B (dim, rank)."""
    import torch

    u, s, vh = torch.linalg.svd(t.delta, full_matrices=False)
    k = min(rank, s.numel())
    energy = float((s * s).sum())
    kept = float((s[:k] * s[:k]).sum()) / energy if energy > 0 else 1.0
    root = s[:k].sqrt()
    left, right = u[:, :k] * root, root[:, None] * vh[:k]      # delta ~ left @ right
    if t.kind == "embedding":                                   # peft: delta = (B @ A).T
        left, right = right.T, left.T
    a = torch.zeros(rank, right.shape[1], dtype=right.dtype, device=right.device)
    b = torch.zeros(left.shape[0], rank, dtype=left.dtype, device=left.device)
    a[:k], b[:, :k] = right, left
    return a, b, kept


def export_lora(base, tuned, out: str | os.PathLike, *, rank: int | None = None, budget_mib: float | None = None,
                dtype: str = "bfloat16", base_ref: str | None = None, device: str | None = None, log=print) -> dict:
    """Writes the LoRA adapter of ``tuned`` (a folder, or a model) over ``base`` into ``out`` and
    returns its report: the rank, the file size and the kept fraction of every layer.

    Exactly one of ``rank`` and ``budget_mib`` (the largest rank whose file fits) is given.
    ``base_ref`` is what the adapter names as its base (default: ``base`` as given).
    """
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    from msn.loading import load_model, resolve_device, resolve_dtype
    from msn.paths import check_apart, clean_staging, ensure_output_dir, replace_folder_files

    if (rank is None) == (budget_mib is None):
        raise MsnError("give exactly one of --rank and --budget-mib")
    if rank is not None and rank < 1:
        raise MsnError(f"--rank must be positive, got {rank}")
    if budget_mib is not None and not budget_mib > 0:
        raise MsnError(f"--budget-mib must be positive, got {budget_mib}")
    store = resolve_dtype(dtype, torch.device("cpu"))
    dev = resolve_device(device)
    check_apart(out, "--out", {"--base": base if isinstance(base, (str, os.PathLike)) else None,
                               "--tuned": tuned if isinstance(tuned, (str, os.PathLike)) else None})
    out = ensure_output_dir(out, "--out")
    if base_ref is None:        # a folder by its absolute path, so the adapter loads from anywhere
        base_ref = (str(Path(base).expanduser().resolve()) if Path(base).expanduser().is_dir() else str(base)) \
            if isinstance(base, (str, os.PathLike)) else base.config.name_or_path
    def load(m):
        return load_model(resolve(str(m)), dtype=torch.float32).to(dev).eval() if isinstance(m, (str, os.PathLike)) \
            else m

    base_model, tuned_model = load(base), load(tuned)
    with torch.no_grad():
        targets, whole, unchanged = plan(base_model, tuned_model)
        if not targets and not whole:
            raise MsnError("the tuned model equals the base model: there is no difference to export")
        if not targets:
            raise MsnError(f"only {', '.join(whole)} changed: a LoRA adapter needs a changed linear layer or "
                           "embedding (save the tuned checkpoint itself)")
        related(base_model, targets)
        whole_bytes = sum(p.numel() * 4 for m in whole for p in tuned_model.get_submodule(m).parameters()) + \
            sum(t.bias.numel() * 4 for t in targets if t.bias is not None)
        itemsize = torch.empty((), dtype=store).element_size()
        full = max(t.full_rank for t in targets)
        if rank is None:
            rank = rank_for_budget(targets, whole_bytes, int(budget_mib * MiB), itemsize)
        elif rank > full:       # past the full rank only zeros would be stored
            log(f"export-lora: --rank {rank} is above the largest full rank of a changed layer ({full}); using {full}")
            rank = full
        log(f"export-lora: {len(targets)} layers at rank {rank}, {len(whole)} modules whole, "
            f"{unchanged} parameters unchanged")
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=[t.name for t in targets],
                            modules_to_save=whole or None,
                            bias="lora_only" if any(t.bias is not None for t in targets) else "none")
        config.base_model_name_or_path = base_ref
        with warnings.catch_warnings():     # the tied-embedding warning: msn merges, which keeps the tie
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(base_model, config)
        inner = peft_model.base_model.model
        layers = {}
        for t in targets:
            a, b, kept = factors(t, rank)
            m = inner.get_submodule(t.name)
            if t.kind == "embedding":
                m.lora_embedding_A["default"].data = a.to(store)
                m.lora_embedding_B["default"].data = b.to(store)
            else:
                m.lora_A["default"].weight.data = a.to(store)
                m.lora_B["default"].weight.data = b.to(store)
                if t.bias is not None:
                    m.base_layer.bias.data.copy_(t.bias)
            layers[t.name] = {"kind": t.kind, "shape": list(t.delta.shape), "kept": kept,
                              "norm": float(t.delta.norm())}
        for name in whole:
            inner.get_submodule(name).modules_to_save["default"].load_state_dict(
                tuned_model.get_submodule(name).state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        state = {k: v.detach().to("cpu", store if "lora_" in k else torch.float32).contiguous()
                 for k, v in state.items()}
    total = sum(v["norm"] ** 2 for v in layers.values())
    report = {"rank": rank, "dtype": str(store).removeprefix("torch."), "base": base_ref,
              "layers": len(targets), "whole_modules": whole, "unchanged_parameters": unchanged,
              "kept": {"overall": sum(v["kept"] * v["norm"] ** 2 for v in layers.values()) / total if total else 1.0,
                       "min": min((v["kept"] for v in layers.values()), default=1.0),
                       "mean": sum(v["kept"] for v in layers.values()) / len(layers) if layers else 1.0},
              "per_layer": layers}
    staged = clean_staging(out / ".export-staging")
    save_file(state, str(staged / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(staged))
    report["bytes"] = (staged / ADAPTER_WEIGHTS).stat().st_size
    (staged / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    replace_folder_files(staged, out, last=REPORT)
    log(f"export-lora: {report['bytes'] / MiB:.2f} MiB; kept {report['kept']['overall']:.1%} of the difference "
        f"(least in one layer {report['kept']['min']:.1%}) -> {out}")
    return report


