"""The planner service: sizes the worker pools from load and SLOs (`genset planner`)."""
