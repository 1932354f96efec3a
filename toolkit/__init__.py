"""toolkit: fastai transfer learning with a data-cleaning GUI.

Stages, one module each: settings -> scrape -> clean -> train -> evaluate -> serve.
"""

__version__ = "0.1.0"
