"""The tracking room: the MLflow run tracker (tracker), the model registry and its champion (registry),
the served text model (serving, pyfunc_model), run names and tags (runinfo) and the UI's saved view (view).
The only room that imports mlflow."""
