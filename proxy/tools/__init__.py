"""What ships beside the proxy: the demo (`turnout demo`, demo.py and fleet_demo.py) and the
sample upstream service (`turnout upstream`, sample.py)."""
