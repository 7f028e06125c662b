"""epx-phantom: the k-step phantom gradient as an epx estimator.

The estimator is :class:`epx_phantom.plugin.Phantom`; the entry point (``epx: phantom``) names the plugin object in
:mod:`epx_phantom.hooks`, which registers it by reference. Nothing is imported here, so that finding the plugin
costs epx no import of torch."""
