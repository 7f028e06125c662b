"""The built-in estimators of epx, one module per method. Each method is a plugin of its own, found through the
``epx`` entry-point group exactly as a third party's would be (the plugin objects are in
:mod:`epx_estimators.hooks`)."""
