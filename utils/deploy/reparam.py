"""Re-parameterise a dual-head YOLOv9 model (PGI auxiliary branch) into its single-head GELAN counterpart.

The auxiliary branch only helps training; inference reads the main branch. Conversion keeps exactly the
layers the main head depends on, renumbers them, and moves the main head weights (DualDDetect cv4/cv5/dfl2)
into a DDetect (cv2/cv3/dfl). The layer correspondence is derived from the model graph and then checked
layer by layer (module type, arguments, inputs) against the target GELAN YAML, so it also works for the
MMQA variants and for custom YAMLs.

Usage:
    python -m utils.deploy.reparam --weights best.pt [--cfg gelan-c.yaml] [--out gelan.pt]
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn as nn

from models.yolo import CFG_DIR, DetectionModel, load_model_yaml
from utils.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from utils.general import LOGGER, UserError, cli

INPUT = None  # marker for "the network input image" in resolved layer inputs

# Upstream index offsets (gelan layer j <- yolov9 layer j + offset) for each released scale, as
# (first gelan layer, last gelan layer + 1, offset), detect head excluded (gelan head <- dual head, whose
# cv4/cv5/dfl2 become cv2/cv3/dfl). Used as a cross-check of the mapping derived from the graph.
UPSTREAM_OFFSETS: dict[str, list[tuple[int, int, int]]] = {
    "t": [(0, 22, 0)],   # aux branch 22-28 comes after the main layers
    "s": [(0, 22, 0)],
    "m": [(0, 22, 1)],   # Silence at 0 dropped
    "c": [(0, 22, 1)],
    "e": [(0, 29, 0), (29, 42, 7)],  # both backbones kept (the second reads the first); aux head 29-35 dropped
}
HEAD_RENAMES = (("cv2.", "cv4."), ("cv3.", "cv5."), ("dfl.", "dfl2."))  # gelan head attr <- dual main attr


# ---------------------------------------------------------------- YAML graph helpers

def _rows(d: dict) -> list:
    return list(d["backbone"]) + list(d["head"])


def _module_name(name) -> str:
    return str(name).replace("torch.nn.", "nn.").replace("nn.", "")


def _resolve(f, i: int) -> list:
    """Absolute input indices of layer i (INPUT for the image); `f` as written in the YAML."""
    out = []
    for x in ([f] if isinstance(f, int) else f):
        x = int(x)
        if x == -1 and i == 0:
            out.append(INPUT)
        else:
            out.append(i + x if x < 0 else x)
    return out


def offset_map(scale: str) -> list[int]:
    """Upstream's gelan <- yolov9 layer indices for a released scale (t, s, m, c, e), detect head excluded."""
    if scale not in UPSTREAM_OFFSETS:
        raise UserError(f"unknown scale '{scale}' (expected one of {', '.join(UPSTREAM_OFFSETS)})")
    return [j + off for a, b, off in UPSTREAM_OFFSETS[scale] for j in range(a, b)]


def main_branch(dual: dict) -> tuple[list[int], dict]:
    """Dual-model layers the main head needs, in order, and old index -> new index (INPUT for a dropped Silence).

    A leading Silence layer whose only user is the next layer (via -1) is dropped, as upstream GELAN does;
    a Silence that other layers read explicitly (yolov9-e's second backbone reads layer 0) is kept.
    """
    rows = _rows(dual)
    head = len(rows) - 1
    if _module_name(rows[head][2]) != "DualDDetect":
        raise UserError(f"{dual.get('yaml_file', 'model')}: not a dual-head model (last layer is {rows[head][2]}); "
                        f"nothing to re-parameterise")
    froms = [_resolve(r[0], i) for i, r in enumerate(rows)]
    nl = len(froms[head]) // 2
    need, stack = {head}, list(froms[head][nl:])
    while stack:
        i = stack.pop()
        if i is INPUT or i in need:
            continue
        need.add(i)
        stack.extend(froms[i])
    users = {i: [j for j in sorted(need) if i in froms[j] and not (j == head and froms[j].index(i) < nl)]
             for i in need}
    dropped = set()
    for i in sorted(need):
        if (_module_name(rows[i][2]) == "Silence" and froms[i] == [INPUT] and users[i] == [i + 1]
                and rows[i + 1][0] == -1 and all(j in dropped for j in need if j < i)):
            dropped.add(i)
    kept = [i for i in sorted(need) if i not in dropped]
    new = {old: j for j, old in enumerate(kept)}
    new.update({i: INPUT for i in dropped})
    return kept, new


def gelan_yaml_for(dual: dict) -> dict:
    """The single-head model dict that holds exactly the main branch of `dual` (a GELAN YAML, synthesised)."""
    rows = _rows(dual)
    kept, new = main_branch(dual)
    n_backbone = len(dual["backbone"])
    out_rows = []
    for j, i in enumerate(kept):
        f, n, name, args = rows[i]
        src = _resolve(f, i)
        if i == len(rows) - 1:  # head: main half only, as a single DDetect
            src = src[len(src) // 2:]
            name = "DDetect"
        mapped = []
        for a in src:
            t = new[a] if a is not INPUT else INPUT
            mapped.append(-1 if (t is INPUT and j == 0) or (t is not INPUT and t == j - 1) else t)
        if any(t is INPUT for t in mapped):
            raise UserError(f"{dual.get('yaml_file', 'model')}: layer {i} reads the input image but is not first; "
                            f"cannot express it as a single-head YAML")
        new_f = mapped[0] if isinstance(f, int) and len(mapped) == 1 else mapped
        out_rows.append([new_f, n, name, copy.deepcopy(args)])
    nb = sum(1 for i in kept if i < n_backbone)
    d = {k: copy.deepcopy(v) for k, v in dual.items() if k not in ("backbone", "head", "yaml_file")}
    d["backbone"], d["head"] = out_rows[:nb], out_rows[nb:]
    name = str(dual.get("yaml_file", "model.yaml"))
    d["yaml_file"] = name.replace("yolov9", "gelan", 1) if name.startswith("yolov9") else f"{Path(name).stem}-gelan.yaml"
    return d


def _signature(d: dict) -> list:
    """Per layer (resolved inputs, n, module, args): what must agree for weights to carry over."""
    sig = []
    for i, (f, n, name, args) in enumerate(_rows(d)):
        sig.append((_resolve(f, i), n, _module_name(name), list(args or [])))
    return sig


def layer_map(dual: dict, gelan: dict) -> list[int]:
    """gelan layer j <- dual layer map[j]; raises UserError at the first layer whose type/args/inputs differ."""
    want = _signature(gelan_yaml_for(dual))
    have = _signature(gelan)
    gname = gelan.get("yaml_file", "gelan YAML")
    for k in ("depth_multiple", "width_multiple"):
        if float(dual.get(k, 1.0)) != float(gelan.get(k, 1.0)):
            raise UserError(f"{gname}: {k} {gelan.get(k, 1.0)} differs from the dual model's {dual.get(k, 1.0)}")
    if len(want) != len(have):
        raise UserError(f"{gname}: has {len(have)} layers but the main branch of "
                        f"{dual.get('yaml_file', 'the model')} has {len(want)}")
    for j, (a, b) in enumerate(zip(want, have)):
        if a != b:
            raise UserError(f"{gname}: layer {j} is {b[2]}{b[3]} from {b[0]}, but the main branch needs "
                            f"{a[2]}{a[3]} from {a[0]}")
    return main_branch(dual)[0]


def find_gelan_cfg(dual: dict) -> dict:
    """Shipped GELAN YAML for a dual YAML (yolov9-c -> gelan-c), else one synthesised from the main branch."""
    name = str(dual.get("yaml_file", ""))
    if name.startswith("yolov9"):
        cand = CFG_DIR / name.replace("yolov9", "gelan", 1)
        if cand.is_file():
            return load_model_yaml(cand)
    LOGGER.info(f"No gelan YAML for '{name or 'model'}' in {CFG_DIR}; using the main branch of the dual YAML")
    return gelan_yaml_for(dual)


# ---------------------------------------------------------------- weights

def convert_state_dict(state: dict, dual: dict, gelan: dict) -> dict:
    """Dual-model state dict -> gelan state dict (keys renumbered, main head renamed, aux branch dropped)."""
    lm = layer_map(dual, gelan)
    head_j = len(lm) - 1
    out = {}
    for j, i in enumerate(lm):
        prefix = f"model.{i}."
        for k, v in state.items():
            if not k.startswith(prefix):
                continue
            rest = k[len(prefix):]
            if j == head_j:
                for dst, src in HEAD_RENAMES:
                    if rest.startswith(src):
                        out[f"model.{j}.{dst}{rest[len(src):]}"] = v
                        break
            else:
                out[f"model.{j}.{rest}"] = v
    return out


def _gelan_dict(dual_model: nn.Module, cfg: str | Path | dict | None) -> dict:
    dual = dual_model.yaml
    if cfg is None:
        g = find_gelan_cfg(dual)
    else:
        g = copy.deepcopy(cfg) if isinstance(cfg, dict) else load_model_yaml(cfg)
    g = copy.deepcopy(g)
    g["nc"] = dual_model.nc
    for k in ("depth_multiple", "width_multiple"):
        g.setdefault(k, dual.get(k, 1.0))
    return g


def reparameterize(model: nn.Module, cfg: str | Path | dict | None = None) -> nn.Module:
    """Single-head DetectionModel with the main-branch weights of dual `model` (same eval outputs).

    cfg: the GELAN YAML (path, name or dict); None picks it from the model's yaml_file (yolov9-c -> gelan-c),
    or synthesises it from the main branch.
    """
    if not getattr(model, "is_dual", False):
        raise UserError(f"{model.yaml.get('yaml_file', 'model')}: already a single-head model; nothing to re-parameterise")
    g = _gelan_dict(model, cfg)
    state = convert_state_dict(model.state_dict(), model.yaml, g)
    device = next(model.parameters()).device
    gelan = DetectionModel(g, ch=model.yaml.get("ch", 3)).to(device)
    own = gelan.state_dict()
    missing = [k for k in own if k not in state]
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or bad:
        raise UserError(f"{g.get('yaml_file', 'gelan')}: weights do not fit: missing {missing[:3]}, shape mismatch {bad[:3]}")
    gelan.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    gelan.names = list(getattr(model, "names", gelan.names))
    gelan.train(model.training)
    return gelan


def reparam_checkpoint(weights: str | Path, cfg: str | Path | dict | None = None,
                       out: str | Path | None = None) -> Path:
    """Convert a dual-head checkpoint of this project into a gelan checkpoint; returns the written path."""
    weights = Path(weights)
    ck = load_checkpoint(weights)
    src = ck["ema"] if ck.get("ema") else ck["model"]
    half = any(v.dtype == torch.float16 for v in src.values())
    dual = model_from_checkpoint(ck).eval()
    gelan = reparameterize(dual, cfg).eval()
    n_dual = sum(p.numel() for p in dual.parameters())
    n_gelan = sum(p.numel() for p in gelan.parameters())
    new = make_checkpoint(gelan, names=gelan.names, epoch=-1, opt=ck.get("opt") or {}, hyp=ck.get("hyp") or {},
                          reparam_from=str(weights.name))
    if half:
        new["model"] = {k: v.half() if v.is_floating_point() else v for k, v in new["model"].items()}
    out = Path(out) if out else weights.with_name(f"{weights.stem}-gelan.pt")
    save_checkpoint(new, out)
    LOGGER.info(f"Re-parameterised {weights} ({dual.yaml.get('yaml_file', 'dual')}, {n_dual:,} parameters) -> "
                f"{out} ({gelan.yaml.get('yaml_file', 'gelan')}, {n_gelan:,} parameters)")
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description="Dual-head YOLOv9 checkpoint -> single-head GELAN checkpoint")
    ap.add_argument("--weights", required=True, help="dual-head checkpoint (.pt of this project)")
    ap.add_argument("--cfg", default=None, help="target gelan YAML (default: from the model, yolov9-x -> gelan-x)")
    ap.add_argument("--out", default=None, help="output checkpoint (default: <weights>-gelan.pt)")
    opt = ap.parse_args(argv)
    return reparam_checkpoint(opt.weights, opt.cfg, opt.out)


if __name__ == "__main__":
    cli(main)()


def main_branch_only(model: nn.Module, log=LOGGER.info) -> nn.Module:
    """Dual-head (YOLOv9) model -> its single-head GELAN form, whose output equals the main branch.

    Why: inference never reads the auxiliary branch, yet running it costs ~40% of yolov9-t's FLOPs. The
    result is checked against the dual model on a random image; if re-parameterisation fails or differs,
    the dual model is kept (inference is then only slower, never different).
    """
    if not getattr(model, "is_dual", False):
        return model
    try:
        single = reparameterize(model).eval()
    except UserError as e:
        log(f"auxiliary branch kept (re-parameterisation failed: {e})")
        return model
    p = next(model.parameters())
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    with torch.no_grad():
        ok = torch.allclose(model(x)[0], single(x)[0], atol=1e-4, rtol=1e-4)
    if not ok:
        log("auxiliary branch kept (re-parameterised outputs differ)")
    return single if ok else model
