"""Worker groups: which set of ClientWorker actors (with which resources) serves which
client. An algorithm with different kinds of clients names them by implementing
`ClientFamilies` (actors/protocol.py): `client_families()` (every family it can have) and
`client_family(client_id)`; without it every client is of the family "default". `runtime.worker_groups` gives families their own groups; the runtime keys
num_workers / num_cpus_per_worker / num_gpus_per_worker / resources_per_worker form the
group "default", which serves every family no group lists."""
from __future__ import annotations

from dataclasses import dataclass, field

from actors.protocol import ClientFamilies
from raysim.config import DEFAULT_GROUP, ConfigError, ExperimentConfig


@dataclass(frozen=True)
class Group:
    name: str
    num_workers: int  # pooled placement; dedicated placement has one actor per client
    num_cpus: float
    num_gpus: float
    resources: dict[str, float] = field(default_factory=dict)
    families: tuple[str, ...] = ()
    clients: int = 0  # how many of the run's clients this group serves


def families_of(algorithm) -> list[str]:
    return list(algorithm.client_families()) if isinstance(algorithm, ClientFamilies) else [DEFAULT_GROUP]


def family_of(algorithm, client_id: int) -> str:
    return algorithm.client_family(client_id) if isinstance(algorithm, ClientFamilies) else DEFAULT_GROUP


def resolve(cfg: ExperimentConfig, algorithm, source: str = "<config>") -> tuple[list[Group], list[int]]:
    """(the groups that serve clients, in config order with "default" last; the group index
    of every client). Raises ConfigError for a family the algorithm does not have."""
    rt = cfg.runtime
    known = families_of(algorithm)
    problems = []
    for i, g in enumerate(rt.worker_groups):
        unknown = [f for f in g.families if f not in known]
        if unknown:
            problems.append(
                f"runtime.worker_groups[{i}].families: {', '.join(map(repr, unknown))} "
                f"{'is not a client family' if len(unknown) == 1 else 'are not client families'} of algorithm "
                f"{cfg.algorithm.name}; its families: {', '.join(known)}"
            )
    if problems:
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(f"  - {p}" for p in problems))
    owner = {f: g.name for g in rt.worker_groups for f in g.families}
    candidates = [
        Group(g.name, g.num_workers, g.num_cpus, g.num_gpus, dict(g.resources), tuple(g.families))
        for g in rt.worker_groups
    ]
    rest = tuple(f for f in known if f not in owner)
    if rest:
        candidates.append(
            Group(
                DEFAULT_GROUP, rt.num_workers, rt.num_cpus_per_worker, rt.num_gpus_per_worker,
                dict(rt.resources_per_worker), rest,
            )
        )  # fmt: skip
    index = {f: i for i, g in enumerate(candidates) for f in g.families}
    client_group = []
    for c in range(cfg.clients.total):
        f = family_of(algorithm, c)
        if f not in index:
            raise ValueError(f"client {c} has family {f!r}, which {type(algorithm).__name__}.client_families() does not list")
        client_group.append(index[f])
    counts = [client_group.count(i) for i in range(len(candidates))]
    # Groups whose families have no client (e.g. a kind with share 0) start no actors.
    keep = [i for i, n in enumerate(counts) if n]
    renumber = {old: new for new, old in enumerate(keep)}
    groups = [
        Group(g.name, g.num_workers, g.num_cpus, g.num_gpus, g.resources, g.families, counts[i])
        for i, g in enumerate(candidates)
        if counts[i]
    ]
    return groups, [renumber[i] for i in client_group]
