"""Nocturne's Kubernetes operator.

Import name ``nocturne_operator``; the folder is ``operator/``, whose name the stdlib owns.
"""

__version__ = "0.1.0"
