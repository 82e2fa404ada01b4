"""The file MLflow runs to build minibert's text pyfunc ("models from code": no pickled object).

`mlflow.pyfunc.log_model(python_model=<this file>, code_paths=[minibert/])` stores it with the
package; loading the model executes it, which hands MLflow the model instance.
"""
from minibert.tracking.serving import set_text_model

set_text_model()
