"""Prometheus metrics of the API: requests by route (`http`), what waits in the database and
the broker (`backlog`), one scrape over every API process (`exposition`, `processes`), and
who may read them (`access`)."""
