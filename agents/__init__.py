"""One file per algorithm. `AGENTS` maps a name to "module:Class"; classes import lazily, so an
agent whose extra dependency (TRL, SB3) is missing does not break the others."""

from __future__ import annotations

import importlib

AGENTS: dict[str, str] = {
    "ddpo": "agents.ddpo:DDPOAgent",
    "ddpo_trl": "agents.ddpo_trl:TRLDDPOAgent",
    "dpok": "agents.dpok:DPOKAgent",
    "draft": "agents.draft:DRaFTAgent",
    "refl": "agents.refl:ReFLAgent",
    "rwr": "agents.rwr:RWRAgent",
    "sb3": "agents.sb3:SB3PPOAgent",
}


def agent_class(name: str):
    if name not in AGENTS:
        raise ValueError(f"unknown agent {name!r}; allowed: {', '.join(sorted(AGENTS))}")
    module, cls = AGENTS[name].split(":")
    return getattr(importlib.import_module(module), cls)
