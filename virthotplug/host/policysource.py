"""Where a domain's policy comes from, highest precedence first:

1. the domain's metadata element (the live definition's, else the persistent one's);
2. the host configuration file (first matching ``[domain:...]`` section, then ``[defaults]``);
3. the built-in default (``report``).

Fields merge one by one, and each value keeps the label of its source. The element is read
and written through ``host.domain.Domain`` (``virDomainGetMetadata``/``SetMetadata``).
"""

from __future__ import annotations

from typing import Mapping, Optional

from virthotplug.core.config import HostConfig
from virthotplug.core.policy import EffectivePolicy, merge_policy
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.domxml import METADATA_KEY, NAMESPACE, parse_policy_element, policy_element

SOURCE_LIVE = "metadata (live)"
SOURCE_PERSISTENT = "metadata (persistent)"


def effective_policy(conn: Connection, dom: Domain, config: HostConfig) -> EffectivePolicy:
    """The domain's policy with the source of every field; ``ConfigError`` when invalid."""
    name = dom.name
    layers = list(config.policy_layers(name, dom.uuid))
    metadata = metadata_layer(dom)
    if metadata is not None:
        layers.insert(0, metadata)
    return merge_policy(layers, domain=name)


def metadata_layer(dom: Domain) -> Optional[tuple[str, Mapping[str, str]]]:
    """The raw fields of our metadata element, live definition first, with their source."""
    name = dom.name
    candidates = []
    if dom.is_active():
        candidates.append((True, SOURCE_LIVE))
    if dom.is_persistent():
        candidates.append((False, SOURCE_PERSISTENT))
    for live, source in candidates:
        text = dom.metadata(NAMESPACE, live=live)
        if text is not None:
            return source, parse_policy_element(text, domain=name)
    return None


def write_policy(
    dom: Domain,
    fields: Optional[Mapping[str, str]],
    *,
    live: bool,
    config: bool,
) -> None:
    """Replace our metadata element with ``fields``, or remove it when ``fields`` is None."""
    xml = None if fields is None else policy_element(fields)
    dom.set_metadata(xml, METADATA_KEY, NAMESPACE, live=live, config=config)


def policy_from_definitions(
    name: str,
    uuid: str,
    metadata: Optional[tuple[bool, Mapping[str, str]]],
    config: HostConfig,
) -> EffectivePolicy:
    """The same merge as ``effective_policy``, from metadata fields already parsed out of
    the domain's definitions (``(live, fields)``: the live definition's element first, as
    ``metadata_layer`` reads it) instead of metadata calls."""
    layers = list(config.policy_layers(name, uuid))
    if metadata is not None:
        live, fields = metadata
        layers.insert(0, (SOURCE_LIVE if live else SOURCE_PERSISTENT, fields))
    return merge_policy(layers, domain=name)
