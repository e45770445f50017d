"""The live dashboard on the admin listener (`GET /`) and its JSON (`GET /dashboard.json`)."""

from sidecar.dashboard.model import DashboardModel
from sidecar.dashboard.routes import dashboard_routes

__all__ = ["DashboardModel", "dashboard_routes"]
