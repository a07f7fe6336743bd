"""SD1.5 and SDXL (the UNet families): their files (detect, single-file checkpoints, the
package's real-architecture configs), loading, tiny models and key names. The families
themselves are core/families/sd15 and core/families/sdxl."""
