"""Label values used while rendering: the 19 Cityscapes train ids, void, and an internal anomaly value."""
from __future__ import annotations

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY,
 PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(len(CLASS_NAMES))
VOID = 255  # ego-vehicle hood, as Cityscapes' "ego vehicle" (train id 255)
ANOMALY = 254  # never written to a Cityscapes label: only the anomaly test sets see it, as 1

# The world renders the eleven classes a driving segmenter must get right; rarer Cityscapes classes
# (wall, fence, rider, truck, bus, train, two-wheelers) are left out, because a class seen in a handful
# of small training pictures only lowers the shipped segmenter's mIoU without teaching anything.
GENERATED_CLASSES = tuple(CLASS_NAMES[i] for i in (ROAD, SIDEWALK, BUILDING, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN,
                                                   VEGETATION, TERRAIN, SKY, PERSON, CAR))
