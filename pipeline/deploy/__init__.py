"""Deployment: the production services on one machine (`make services`) and the engines kiln runs on past it."""
