"""Metrics (one definition, `monitoring.metrics`), the run summary for a Pushgateway
(`monitoring.push`) and the Grafana dashboard generator (`monitoring.dashboards`)."""
