"""Ray Serve application of NeuronMap: extraction, runs and analyses over HTTP (FastAPI ingress).

`neuronmap serve` (cli.py) starts it; `serve_config.yaml` deploys it with `serve deploy`
(`import_path: deployments.app:build_app`). The request handling lives in plain classes
(`api.NeuronMapAPI`, `extractor.ExtractionService`, `catalog.RunsCatalog`, `analysis_jobs.JobManager`,
`guard.Guard`); `app.py` wraps them in Serve deployments and `options.py` holds every Serve option.
Importing this package imports nothing heavy; `neuronmap` never imports it.
"""
