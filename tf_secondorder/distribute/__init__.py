"""tf.distribute integration. Private Keras/TF API is confined to _keras_hooks."""
