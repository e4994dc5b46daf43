"""flowserve's HTTP service. Import `service.app.create_app`; `python -m service` runs it."""
