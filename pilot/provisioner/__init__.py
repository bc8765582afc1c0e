"""Provisioners: how a site's SuperNode comes and goes.

The ServerApp decides *when* a site should exist (pilot.control.policy); a provisioner makes it so.
The interface is deliberately small so a cloud or Kubernetes backend fits behind it:

- ``start(site)``: begin provisioning; returns at once (provisioning takes time, the site is
  *ready* when its SuperNode has connected and answered a QUERY — the ServerApp sees that,
  not the provisioner). Idempotent.
- ``stop(site, drain=True)``: release the site. ``drain`` asks for a graceful shutdown (the
  ServerApp has already collected the site's partial work); ``drain=False`` kills at once.
- ``status()``: ``{site: state}`` with state one of ``provisioning`` (waiting out the emulated
  delay), ``running``, ``stopping``, ``stopped``, ``failed:<detail>`` or ``external``.
- ``close()``: stop everything this provisioner started.

Kinds: ``subprocess`` (local ``flower-supernode`` processes, pilot/provisioner/subprocess.py),
``none`` (SuperNodes started by hand, pilot/provisioner/none.py) and ``kubernetes`` (one
SitePool per site, scaled through its ``/scale`` subresource, pilot/provisioner/kubernetes.py).
"""

from __future__ import annotations

from typing import Any

from pilot.provisioner.base import KINDS, Provisioner

__all__ = ["KINDS", "Provisioner", "make_provisioner"]


def make_provisioner(kind: str, **kwargs: Any) -> Provisioner:
    """``kind`` from the run config; kwargs go to the backend's constructor."""
    if kind == "subprocess":
        from pilot.provisioner.subprocess import SubprocessProvisioner

        return SubprocessProvisioner(**kwargs)
    if kind == "none":
        from pilot.provisioner.none import NoneProvisioner

        return NoneProvisioner(**kwargs)
    if kind == "kubernetes":
        from pilot.provisioner.kubernetes import KubernetesProvisioner

        return KubernetesProvisioner(**kwargs)
    raise ValueError(f"provisioner {kind!r} is not supported; use one of {', '.join(KINDS)}")
