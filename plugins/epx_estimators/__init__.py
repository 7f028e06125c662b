"""The built-in estimators of epx. Each module is a plugin registered through the ``epx`` entry-point group,
exactly as a third party's would be."""
