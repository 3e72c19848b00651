"""Task modules (`config.task_module`): the loss and metrics a run trains and evaluates."""
