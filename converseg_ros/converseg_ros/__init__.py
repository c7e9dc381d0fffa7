"""converseg_ros: the ROS 2 adapter of ConverSeg Edge.

Importable without ROS: image_conversion, queries, pipeline, params, launch_plan, results, demo_scene.
Need rclpy: segment_node, demo_camera (and launch_main at run time, through the nodes it starts).
"""
