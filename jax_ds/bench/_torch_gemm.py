"""cuBLAS FP8 GEMM through torch: the vendor baseline of `python -m jax_ds.bench gemm`.

torch selects cuBLASLt's blockwise scaling (1x128 groups for a, 128x128 blocks for b; CUDA >=
12.9, sm90) from the shapes and strides of the scale tensors, and the layout it accepts has changed
between releases (outer-dim-major scale_a, scale_b padded to 4 along K or not, the `F.scaled_mm`
recipe API or the legacy `torch._scaled_mm`). So every recipe below is tried in turn, each result
is checked against our float32 reference on the same quantized inputs, and the first that matches
is used (and tried first on the next shape). A recipe that runs but disagrees is rejected, never
timed. Per-row / per-column scaling (`_scaled_mm` rowwise) is measured as a second anchor.
"""

from __future__ import annotations

import numpy as np

DIFF_LIMIT = 1e-3


def _member(enum, *names):
    for name in names:
        if hasattr(enum, name):
            return getattr(enum, name)
    return None


class TorchGemm:
    """Runs and times the torch columns; remembers which blockwise recipe works, why others fail."""

    def __init__(self, enabled=True):
        self.torch = None
        self.chosen = None          # name of the blockwise recipe in use
        self.rejected = {}          # recipe name -> why it was not used (last shape seen)
        if not enabled:
            self.status = "disabled (--no-torch)"
            return
        try:
            import torch
        except Exception as e:  # torch is optional
            self.status = f"import torch failed ({type(e).__name__}: {e})"
            return
        if not torch.cuda.is_available():
            self.status = f"torch {torch.__version__} sees no CUDA device"
            return
        self.torch = torch
        self.status = f"torch {torch.__version__} (CUDA {torch.version.cuda})"

    def report(self):
        return {"status": self.status, "blockwise_recipe": self.chosen, "rejected": self.rejected}

    # ---- inputs --------------------------------------------------------------------------------
    def _tensor(self, x):
        """A JAX array as a CUDA torch tensor, through host memory (simple; outside the timing)."""
        x = np.asarray(x)
        if "float8" in x.dtype.name:
            t = self.torch.from_numpy(np.array(x).view(np.uint8))  # a writable copy
            return t.cuda().view(self.torch.float8_e4m3fn)
        return self.torch.from_numpy(np.array(x)).cuda()

    def _recipes(self):
        """name -> (call(a, b, sa, sb), layout(sa, sb) -> (sa, sb)); a [M,K], b [N,K] fp8 row-major,
        sa [M, ceil(K/128)] and sb [ceil(N/128), ceil(K/128)] float32 contiguous."""
        torch = self.torch
        func = torch.nn.functional

        def outer(sa):  # [M, kb] with strides (1, M): "outer-dim-major"
            return sa.t().contiguous().t()

        def pad4(sb):  # [nb, round_up(kb, 4)] contiguous, zero-filled past kb
            nb, kb = sb.shape
            p = sb.new_zeros(nb, -(-kb // 4) * 4)
            p[:, :kb] = sb
            return p

        def legacy(a, b, sa, sb):
            return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

        recipes = {
            "_scaled_mm(scale_a outer-major, scale_b=sb.t())": (
                legacy, lambda sa, sb: (outer(sa), sb.t())),
            "_scaled_mm(scale_a outer-major, scale_b=pad4(sb)[:, :kb].t())": (
                legacy, lambda sa, sb: (outer(sa), pad4(sb)[:, :sb.shape[1]].t())),
            "_scaled_mm(scale_a contiguous, scale_b=sb.t())": (legacy, lambda sa, sb: (sa, sb.t())),
        }
        kind = getattr(func, "ScalingType", None)
        r1 = _member(kind, "BlockWise1x128", "Blockwise_1x128", "BLOCKWISE_1x128")
        r2 = _member(kind, "BlockWise128x128", "Blockwise_128x128", "BLOCKWISE_128x128")
        if hasattr(func, "scaled_mm") and r1 is not None and r2 is not None:

            def v2(a, b, sa, sb):
                return func.scaled_mm(a, b.t(), scale_a=sa, scale_recipe_a=r1, scale_b=sb,
                                      scale_recipe_b=r2, output_dtype=torch.bfloat16)

            recipes.update({
                "F.scaled_mm(BlockWise, scale_a outer-major, scale_b=pad4(sb).t())": (
                    v2, lambda sa, sb: (outer(sa), pad4(sb).t())),
                "F.scaled_mm(BlockWise, scale_a outer-major, scale_b=sb.t())": (
                    v2, lambda sa, sb: (outer(sa), sb.t())),
                "F.scaled_mm(BlockWise, scale_a outer-major, scale_b=sb)": (
                    v2, lambda sa, sb: (outer(sa), sb)),
            })
        else:
            self.rejected["F.scaled_mm"] = "no F.scaled_mm with blockwise ScalingType here"
        return recipes

    # ---- measuring ---------------------------------------------------------------------------
    def _check(self, out, expected):
        from jax_ds.testing import calc_diff

        d = float(calc_diff(out.float().cpu().numpy(), expected))
        if not d < DIFF_LIMIT:
            raise ValueError(f"result disagrees with the reference: calc_diff {d:.2e}")
        return d

    def measure(self, name, sets, ref, measure_fn):
        """Times `name` ("torch_blockwise" / "torch_rowwise") on the JAX input sets with
        measure_fn(call, torch_arg_sets); returns the row's cell: the timings, or {"na": reason} /
        {"error": message}."""
        if self.torch is None:
            return {"na": self.status}
        if ref is None and name == "torch_blockwise":
            return {"na": "no reference to verify the result against"}
        torch = self.torch
        torch.cuda.empty_cache()  # hand back what the previous shape cached
        try:
            if name == "torch_rowwise":
                sets_t = [tuple(self._tensor(x) for x in s["row"]) for s in sets]

                def call(a, sa, b, sb):
                    return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.t(),
                                            out_dtype=torch.bfloat16)

                a, sa, b, sb = sets_t[0]
                expected = ((a.float() * sa) @ (b.float() * sb).t()).cpu().numpy()
                diff = self._check(call(*sets_t[0]), expected)
                label = "rowwise"
            else:
                raw = [tuple(self._tensor(x) for x in s["block"]) for s in sets]
                recipes = self._recipes()
                order = ([self.chosen] if self.chosen in recipes else []) + [
                    r for r in recipes if r != self.chosen]
                for label in order:
                    fn, layout = recipes[label]
                    try:
                        sets_t = [(a, b, *layout(sa, sb)) for a, sa, b, sb in raw]
                        diff = self._check(fn(*sets_t[0]), ref)
                        call = fn
                        break
                    except Exception as e:  # try the next layout
                        self.rejected[label] = f"{type(e).__name__}: {str(e).strip()[:300]}"
                else:
                    return {"na": "no blockwise recipe accepted or verified (see torch.rejected)"}
                self.chosen = label
                self.rejected.pop(label, None)
            result = measure_fn(call, sets_t)
            return {**result, "recipe": label, "diff": diff}
        except Exception as e:
            return {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
