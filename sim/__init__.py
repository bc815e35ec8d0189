"""sim: a simulated robot for the policy server, on gymnasium's MuJoCo Reacher-v5.

    scene.py          ReacherScene (physics, two offscreen cameras, the policy-visible state, the
                      arm's joint PD) and ReachTask (three targets in turn, success)
    expert.py         ReachExpert: the inverse-kinematics setpoint (reads the target; the policy may not)
    robot.py          SimRobot: a RobotPort that runs the scene in real time on its own thread
    demos.py          expert demonstrations -> chunked behaviour-cloning dataset
    train.py          python -m sim.train: demos + training -> checkpoints/demo
    agents.py         expert, random and in-process checkpoint, in simulated time (no server)
    network_delay.py  added latency in the robot client's gRPC channel
    episode.py        python -m sim.episode: one closed-loop episode through a running app

Needs gymnasium[mujoco] and, for offscreen rendering without a display, MUJOCO_GL=egl.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco: offscreen, no display needed
