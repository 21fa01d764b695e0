"""FP8 in one page: DeepSeek-V3 block scaling, an FP8 GEMM, training through an FP8 linear layer.

  python examples/fp8_demo.py                      # CPU: the pure-JAX references, a few seconds
  python examples/fp8_demo.py --m 4096 --n 7168 --k 7168   # a V3-sized GEMM (use a GPU)

On a CUDA GPU with the kernel library built (`python -m jax_ds.info`), impl="auto" runs the kernels.
"""

import argparse
import logging
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.progress import track

import jax_ds
from jax_ds import cli, info
from jax_ds.testing import calc_diff


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=cli.at_least(1), default=256, help="tokens (rows of the activation)")
    p.add_argument("--n", type=cli.at_least(1), default=512,
                   help="output features (rows of the weight)")
    p.add_argument("--k", type=cli.at_least(1), default=1024,
                   help="input features (multiple of 128)")
    p.add_argument("--steps", type=cli.at_least(1), default=30,
                   help="training steps through fp8_linear")
    p.add_argument("--lr", type=cli.positive_float, default=3e-2, help="Adam learning rate")
    p.add_argument("--impl", default="auto", choices=["auto", "ffi", "xla"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def main():
    args = parse_args()
    # jax-ds logs once per op which path it takes (kernel or reference, and why).
    logging.basicConfig(stream=sys.stdout, format="  [log] %(message)s")
    logging.getLogger("jax_ds").setLevel(logging.INFO)
    kx, kw, kt = jax.random.split(jax.random.key(args.seed), 3)
    x = jax.random.normal(kx, (args.m, args.k), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (args.n, args.k), jnp.float32) / np.sqrt(args.k)
    w = w.astype(jnp.bfloat16)
    print(f"jax-ds {jax_ds.__version__} on {jax.default_backend()}; fp8_gemm takes: "
          f"{info.op_paths()['fp8_gemm'] if args.impl == 'auto' else args.impl}")

    # 1. Quantize: activations per (1, 128) token group, weights per (128, 128) block.
    x_fp8, x_scale = jax_ds.quantize_fp8(x, block=(1, 128), impl=args.impl)
    w_fp8, w_scale = jax_ds.quantize_fp8(w, block=(128, 128), impl=args.impl)
    print(f"x {x.shape} bf16 -> {x_fp8.dtype} + scales {x_scale.shape}; "
          f"w {w.shape} -> scales {w_scale.shape}")
    print(f"  round-trip error: x {rel_err(jax_ds.dequantize_fp8(x_fp8, x_scale), x):.2%}, "
          f"w {rel_err(jax_ds.dequantize_fp8(w_fp8, w_scale, (128, 128)), w):.2%}")

    # 2. The FP8 GEMM against a bf16 matmul (f32 accumulation) of the unquantized inputs.
    gemm = jax.jit(lambda *ops: jax_ds.fp8_gemm(*ops, impl=args.impl))
    y_fp8 = gemm(x_fp8, x_scale, w_fp8, w_scale).block_until_ready()
    start = time.perf_counter()
    y_fp8 = gemm(x_fp8, x_scale, w_fp8, w_scale).block_until_ready()
    ms = (time.perf_counter() - start) * 1e3
    y_bf16 = jnp.dot(x, w.T, preferred_element_type=jnp.float32)
    tflops = 2 * args.m * args.n * args.k / (ms * 1e-3) / 1e12
    shapes = f"[{args.m}x{args.k}] x [{args.n}x{args.k}]^T"
    print(f"fp8_gemm {shapes}: {ms:.2f} ms ({tflops:.2f} TFLOP/s)")
    print(f"  vs bf16 matmul: relative error {rel_err(y_fp8, y_bf16):.2%}, "
          f"calc_diff {calc_diff(y_fp8, y_bf16):.1e} (DeepGEMM accepts < 1e-3)")

    # 3. Training through fp8_linear: fit a student weight to a teacher's outputs.
    w_teacher = jax.random.normal(kt, (args.n, args.k), jnp.float32) / np.sqrt(args.k)
    y_target = x.astype(jnp.float32) @ w_teacher.T

    x32 = x.astype(jnp.float32)

    def loss_fn(w_student, x32, linear):
        return jnp.mean(jnp.square(linear(x32, w_student) - y_target))

    fp8_linear = lambda x, w: jax_ds.fp8_linear(x, w, impl=args.impl)  # noqa: E731
    exact_linear = lambda x, w: x @ w.T  # noqa: E731
    w_student = jnp.zeros((args.n, args.k), jnp.float32)
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(w_student)

    @jax.jit
    def step(w_student, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(w_student, x32, fp8_linear)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(w_student, updates), opt_state, loss

    losses = []
    for _ in track(range(args.steps), description="training through fp8_linear"):
        w_student, opt_state, loss = step(w_student, opt_state)
        losses.append(float(loss))  # the loss each update starts from
    losses.append(float(jax.jit(loss_fn, static_argnums=2)(w_student, x32, fp8_linear)))

    print(f"fp8_linear: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} Adam steps")
    # The backward pass at the random weight w: dgrad (input grad) through the FP8 GEMM, wgrad
    # (weight grad) in float32 (it differs from exact only through the FP8 forward's residual).
    w32 = w.astype(jnp.float32)
    dw, dx = jax.grad(loss_fn, argnums=(0, 1))(w32, x32, fp8_linear)
    dw_exact, dx_exact = jax.grad(loss_fn, argnums=(0, 1))(w32, x32, exact_linear)
    print(f"  grads vs exact f32: input {rel_err(dx, dx_exact):.2%}, "
          f"weight {rel_err(dw, dw_exact):.2%}")
    ok = calc_diff(y_fp8, y_bf16) < 1e-3 and losses[-1] < losses[0]
    print(f"summary: fp8_gemm error {rel_err(y_fp8, y_bf16):.2%}, training loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f}: {'OK' if ok else 'UNEXPECTED'}")


if __name__ == "__main__":
    cli.run(main)
