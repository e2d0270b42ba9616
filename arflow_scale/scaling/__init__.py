"""Scaling-law experiments: sweep expansion and launch, power-law fits, reports."""
from .fit import (PowerLawFit, ScalingPoint, fit_power_law, fit_scaling_laws, points_from_csv,
                  points_from_mlflow, write_points_csv)

__all__ = ["PowerLawFit", "ScalingPoint", "fit_power_law", "fit_scaling_laws", "points_from_csv",
           "points_from_mlflow", "write_points_csv"]
