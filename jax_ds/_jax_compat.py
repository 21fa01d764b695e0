"""JAX API differences between the versions we run on (the device's 0.11.2, CI's 0.12.x)."""

import jax


def single_device_sharding(device):
    """The sharding that places a whole array on `device`: `make_single_device_sharding` where it
    exists (0.11 on; 0.12.1 deprecates constructing `SingleDeviceSharding` directly), the class
    otherwise."""
    make = getattr(jax.sharding, "make_single_device_sharding", None)
    return make(device) if make is not None else jax.sharding.SingleDeviceSharding(device)
