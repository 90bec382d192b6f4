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

# Trams are not part of the world: a class seen in a handful of images would only lower the shipped
# segmenter's mIoU without teaching anything. Every other train id is rendered.
GENERATED_CLASSES = tuple(name for i, name in enumerate(CLASS_NAMES) if i != TRAIN)
