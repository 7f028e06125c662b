"""epx-phantom: the k-step phantom gradient as an epx estimator (entry point ``epx: phantom``)."""

from epx_phantom.plugin import Phantom, PhantomConfig

__all__ = ["Phantom", "PhantomConfig"]
