"""Who a trigger belongs to and what the mollifier may do for it: the environment (organization,
project) and the organization's flags, from the control plane's client-side cache (kept fresh by
its invalidation feed), so a trigger costs no control-plane round trip once warm."""

from __future__ import annotations

from dataclasses import dataclass

from runops.controlplane.client import ControlPlaneClient
from runops.controlplane.model import environment_not_found
from runops.kit.errors import NotFound


@dataclass(frozen=True)
class EnvPolicy:
    environment_id: str
    organization_id: str
    project_id: str
    # The organization has the mollifier flag (buffering and claims apply).
    enabled: bool
    # Decide as usual, but only log and count what would have been buffered.
    shadow: bool


class Policies:
    def __init__(
        self, control_plane: ControlPlaneClient, *, enabled: bool, shadow_mode: bool
    ) -> None:
        self._control_plane = control_plane
        # The global switch and global shadow mode (settings).
        self.enabled = enabled
        self.shadow_mode = shadow_mode

    async def of(self, environment_id: str) -> EnvPolicy:
        """NOT_FOUND `ENVIRONMENT_NOT_FOUND` for an environment the control plane lacks."""
        env = await self._control_plane.get_environment(environment_id)
        if env is None:
            raise environment_not_found(environment_id)
        organization_id = env.organization.id
        try:
            flags = await self._control_plane.get_organization_flags(organization_id)
            org_enabled, org_shadow = flags.mollifier_enabled, flags.mollifier_shadow_mode
        except NotFound:
            org_enabled = org_shadow = False
        return EnvPolicy(
            environment_id=environment_id,
            organization_id=organization_id,
            project_id=env.project.id,
            enabled=self.enabled and org_enabled,
            shadow=self.enabled and (self.shadow_mode or org_shadow),
        )
