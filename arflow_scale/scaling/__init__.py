"""Scaling-law experiments: sweep designs and launch, IsoFLOP profiles, the parametric law, reports."""
from .analysis import ScalingAnalysis, analyse
from .bootstrap import BootstrapSettings, Estimate
from .fit import PowerLawFit, fit_power_law, fit_scaling_laws
from .holdout import PredictionCheck, prediction_check
from .isoflop import IsoFlopAnalysis, fit_isoflop
from .parametric import ParametricFit, fit_parametric
from .points import ScalingPoint, points_from_csv, points_from_mlflow, write_points_csv

__all__ = ["BootstrapSettings", "Estimate", "IsoFlopAnalysis", "ParametricFit", "PowerLawFit", "PredictionCheck",
           "ScalingAnalysis", "ScalingPoint", "analyse", "fit_isoflop", "fit_parametric", "fit_power_law",
           "fit_scaling_laws", "points_from_csv", "points_from_mlflow", "prediction_check", "write_points_csv"]
