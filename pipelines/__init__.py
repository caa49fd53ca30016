"""Ray stages: Ray Data readers and UDFs, Ray Train loops, batch generation, MLflow tracking.

Imports vitdit, ray, mlflow and pyarrow; never ``jobs``.
"""
